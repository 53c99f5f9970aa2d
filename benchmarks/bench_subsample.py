"""evaluate's uniform subsample of wide features, block by block: the buffer ``Subsample`` against concatenating each
block to the kept rows (the way it was written before), side by side, on the same keys and rows.

Inception-width rows (2048 float32) arrive in blocks as ``evaluate`` reads them; both keep the ``--size`` rows of the
smallest keys. Each variant runs in alternating rounds; the script checks that both keep the same rows, and prints
and writes the median seconds and their ratio. Results: ``benchmarks/results/subsample_cpu.json``. Run from the
repository root: ``python -m benchmarks.bench_subsample``.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import numpy as np

from benchmarks.paths import RESULTS, write_json
from benchmarks.timing import timed
from pipeline.evaluate.metrics import Subsample, subsample_keys


def concatenating(size: int, blocks: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The kept rows as one array, each block concatenated to it and the smallest keys kept (the baseline)."""
    keys, rows = np.zeros(0, np.uint64), None
    for block_keys, block_rows in blocks:
        keys = np.concatenate([keys, block_keys])
        rows = block_rows if rows is None else np.concatenate([rows, block_rows])
        keep = np.sort(np.argpartition(keys, size - 1)[:size]) if len(keys) > size else slice(None)
        keys, rows = keys[keep], rows[keep]
    return rows[np.argsort(keys, kind="stable")]


def buffered(size: int, blocks: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    kept = Subsample(size)
    for block_keys, block_rows in blocks:
        kept.add(block_keys, block_rows)
    return kept.features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=20_000, help="the subsample's size (evaluate's --max-samples)")
    parser.add_argument("--width", type=int, default=2048, help="feature width (Inception pool: 2048)")
    parser.add_argument("--block", type=int, default=1024, help="rows per block read")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--results", type=Path, default=RESULTS / "subsample_cpu.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    keys = subsample_keys(0, [f"s{i}" for i in range(args.rows)])
    rows = rng.standard_normal((args.rows, args.width), dtype=np.float32)
    blocks = [(keys[i:i + args.block], rows[i:i + args.block]) for i in range(0, args.rows, args.block)]
    seconds: dict[str, list[float]] = {"concatenating": [], "buffered": []}
    for _ in range(args.rounds):
        kept = {}
        for name, run in (("concatenating", concatenating), ("buffered", buffered)):
            kept[name], elapsed = timed(run, args.size, blocks)
            seconds[name].append(elapsed)
        np.testing.assert_array_equal(kept["buffered"], kept["concatenating"])  # the same rows, in the same order
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    ratio = medians["concatenating"] / medians["buffered"]
    for name, median in medians.items():
        print(f"{name:>14}: {median:.2f} s (rounds {', '.join(f'{s:.2f}' for s in seconds[name])})")
    print(f"buffered is {ratio:.1f}x faster at {args.rows:,} rows x {args.width} in blocks of {args.block}, "
          f"size {args.size:,}; both keep the same rows")
    settings = {key: value for key, value in vars(args).items() if key != "results"}
    write_json(args.results, {"settings": settings, "cpu_count": os.cpu_count(), "seconds": seconds,
                              "median_s": medians, "speedup": ratio, "same_rows": True})


if __name__ == "__main__":
    main()
