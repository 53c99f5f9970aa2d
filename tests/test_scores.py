"""The run's score summary in one bounded pass (pipeline/generate/scores.py) against the whole-array answers it
replaces: exact moments, exact quantiles while the run fits the sample and within the stated rank error beyond,
and the contact sheet's rows as a full sort picks them."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.generate.scores import EPSILON, ORDER, SAMPLE_SIZE, Extremes, Moments, Reservoir, ScoreSummary

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def batches(values: np.ndarray, size: int) -> list[np.ndarray]:
    return [values[start:start + size] for start in range(0, len(values), size)]


def test_moments_streamed_equal_numpys_on_the_whole_array():
    values = np.random.default_rng(0).normal(-1e4, 3.0, 10_007)  # a large mean: a plain sum of squares would cancel
    moments = Moments()
    for part in batches(values, 977):
        moments.add(part)
    assert moments.count == len(values)
    assert moments.mean == pytest.approx(values.mean(), rel=1e-13)
    assert moments.std == pytest.approx(values.std(), rel=1e-10)


def test_a_run_that_fits_the_sample_gets_its_exact_quantiles():
    values = np.random.default_rng(1).normal(size=5_000)
    reservoir = Reservoir(size=5_000)
    for part in batches(values, 300):
        reservoir.add(part)
    sample = reservoir.sample()
    assert sorted(sample) == sorted(values)
    assert [np.quantile(sample, q) for q in QUANTILES] == [np.quantile(values, q) for q in QUANTILES]


def test_beyond_the_sample_each_quantile_is_within_the_stated_rank_error():
    """A sorted stream of 200,000 values into a sample of 4,000: a sample that favoured early or late batches
    would be off by far more. The bound is the module's (Hoeffding) at this sample size, failing with
    probability below 1e-9 per quantile; the seed is fixed, so the test is deterministic."""
    values, size = np.arange(200_000, dtype=np.float64), 4_000
    reservoir = Reservoir(size=size)
    for part in batches(values, 1_000):
        reservoir.add(part)
    sample = reservoir.sample()
    assert len(sample) == size and len(np.unique(sample)) == size  # without replacement
    bound = math.sqrt(math.log(2 / 1e-9) / (2 * size))
    for q in QUANTILES:
        rank = np.searchsorted(values, np.quantile(sample, q)) / len(values)
        assert abs(rank - q) < bound
    assert math.sqrt(math.log(2 / 1e-9) / (2 * SAMPLE_SIZE)) <= EPSILON  # the bound the module states


def test_the_rarest_and_most_typical_are_the_ends_of_a_full_sort():
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 40, 500).astype(np.float64)  # many ties: the sample id breaks them, as a sort does
    table = pa.table({"sample_id": [f"id{i:04d}" for i in rng.permutation(500)], "jepa_score": scores,
                      "__filename": [f"f{i // 50}" for i in range(500)]})
    extremes = Extremes(8)
    for batch in table.to_batches(max_chunksize=37):
        extremes.add(pa.Table.from_batches([batch]))
    ranked = table.take(pc.sort_indices(table, sort_keys=ORDER))
    rarest, typical = extremes.ends()
    assert rarest.to_pylist() == ranked.slice(0, 8).to_pylist()
    assert typical.to_pylist() == ranked.slice(492).to_pylist()
    short = Extremes(8)
    short.add(table.slice(0, 5))
    assert short.ends()[0].num_rows == short.ends()[1].num_rows == 5  # fewer rows than a sheet: both ends show all


def test_the_summary_reads_each_batch_into_all_three():
    table = pa.table({"sample_id": ["a", "b", "c"], "jepa_score": [3.0, 1.0, 2.0], "__filename": ["x", "x", "y"]})
    summary = ScoreSummary(sheet_size=1)
    for batch in table.to_batches(max_chunksize=2):
        summary.add(batch)
    assert (summary.moments.count, summary.moments.mean) == (3, 2.0)
    assert sorted(summary.reservoir.sample()) == [1.0, 2.0, 3.0]
    assert [t.column("sample_id").to_pylist() for t in summary.extremes.ends()] == [["b"], ["a"]]
