"""A run's JEPA-SCOREs summarised in one streamed pass, in memory that does not grow with the run.

The driver's summary of a finished run (pipeline/generate/job.py) reads the committed rows a row group at a time:
- mean and standard deviation exact (each batch's count, mean and sum of squared deviations, merged by Chan's
  pairwise update, so no large sum cancels);
- quantiles and the histogram from a uniform sample of at most ``SAMPLE_SIZE`` scores (``Reservoir``): every
  score while the run has no more, so a run of up to a million samples logs the exact quantiles. Beyond that
  each logged quantile is the run's quantile at a rank within EPSILON of its own (Hoeffding: P(|F_m(x) - F_N(x)|
  > eps) <= 2 exp(-2 m eps^2) at each of the five points for a sample of m, which sampling without replacement
  only tightens), except with probability below 1e-9;
- the rarest and the most typical rows (``Extremes``), by (jepa_score, sample_id) as a full sort orders them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SAMPLE_SIZE = 1_000_000  # scores kept for the quantiles: 16 MB with their keys
EPSILON = 0.0035  # the quantiles' rank error bound beyond SAMPLE_SIZE (module docstring)
ORDER = [("jepa_score", "ascending"), ("sample_id", "ascending")]


@dataclass
class Moments:
    """Count, mean and standard deviation of a stream of batches, exact up to rounding (Chan et al., 1979)."""

    count: int = 0
    mean: float = 0.0
    squares: float = 0.0  # sum of squared deviations from the mean

    def add(self, values: np.ndarray) -> None:
        if not len(values):
            return
        n, mean = len(values), float(values.mean())
        squares = float(((values - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.squares += squares + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        """The population standard deviation (numpy's default, ddof 0)."""
        return math.sqrt(self.squares / self.count)


@dataclass
class Reservoir:
    """A uniform sample without replacement of at most ``size`` values of a stream: each value draws a random
    key and the ``size`` smallest keys are kept. Every value while the stream holds no more than ``size``."""

    size: int
    seed: int = 0
    _rng: np.random.Generator = field(init=False)
    _values: list[np.ndarray] = field(default_factory=list, init=False)
    _keys: list[np.ndarray] = field(default_factory=list, init=False)
    _held: int = field(default=0, init=False)
    _threshold: float = field(default=1.0, init=False)  # no key at or above it can be among the kept

    def __post_init__(self):
        self._rng = np.random.default_rng(self.seed)

    def add(self, values: np.ndarray) -> None:
        keys = self._rng.random(len(values))
        taken = keys < self._threshold
        self._values.append(values[taken])
        self._keys.append(keys[taken])
        self._held += int(taken.sum())
        if self._held >= 2 * self.size:  # compacted now and then: each value is copied O(1) times on average
            self._compact()

    def sample(self) -> np.ndarray:
        self._compact()
        return self._values[0] if self._values else np.empty(0)

    def _compact(self) -> None:
        values, keys = np.concatenate(self._values or [np.empty(0)]), np.concatenate(self._keys or [np.empty(0)])
        if len(keys) > self.size:
            kept = np.argpartition(keys, self.size - 1)[:self.size]
            values, keys = values[kept], keys[kept]
            self._threshold = float(keys.max())
        self._values, self._keys, self._held = [values], [keys], len(values)


@dataclass
class Extremes:
    """The ``count`` rarest and ``count`` most typical rows of a stream of (sample_id, jepa_score, ...) batches,
    ordered by (jepa_score, sample_id): both ends of the sort of every row, kept from each batch's."""

    count: int
    _kept: pa.Table | None = field(default=None, init=False)

    def add(self, batch: pa.Table) -> None:
        table = batch if self._kept is None else pa.concat_tables([self._kept, batch])
        ranked = table.take(pc.sort_indices(table, sort_keys=ORDER))
        if len(ranked) > 2 * self.count:
            ranked = pa.concat_tables([ranked.slice(0, self.count), ranked.slice(len(ranked) - self.count)])
        self._kept = ranked

    def ends(self) -> tuple[pa.Table, pa.Table]:
        """(the rarest, the most typical), each in ascending order; they overlap when the stream is short."""
        ranked = self._kept
        return ranked.slice(0, self.count), ranked.slice(max(0, len(ranked) - self.count))


@dataclass
class ScoreSummary:
    """What the run's summary needs of its scores, from one pass over its committed rows."""

    sheet_size: int
    moments: Moments = field(default_factory=Moments)
    reservoir: Reservoir = field(default_factory=lambda: Reservoir(SAMPLE_SIZE))
    extremes: Extremes = field(init=False)

    def __post_init__(self):
        self.extremes = Extremes(self.sheet_size)

    def add(self, batch: pa.RecordBatch) -> None:
        scores = batch.column("jepa_score").to_numpy(zero_copy_only=False)
        self.moments.add(scores)
        self.reservoir.add(scores)
        self.extremes.add(pa.Table.from_batches([batch]))
