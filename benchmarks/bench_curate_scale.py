"""A curated rare set at scale: the filter on 1,000,000 synthetic rows, plain top-k beside near-duplicate removal
with diverse-rarest selection, wall time and peak memory of the whole process tree.

Rows like those of benchmarks/bench_filter_scale.py (tiny PNGs, random scores with a few null / NaN, ten classes),
each with its own 64-float embedding: one of 2,000 cluster centres plus noise, and a quarter of the rows near-copies
(cosine about 0.9998) of another row of their file, with its score and class: the repeated oddity guidance makes. Each variant
runs ``jepa-minority filter`` in a subprocess (``--keep-fraction 0.01 --per class_label``), measured as that
benchmark measures. Results: benchmarks/results/curate_scale_cpu.json. Run from the repository root:
``python -m benchmarks.bench_curate_scale``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.bench_filter_scale import run_filter_measured, tiny_pngs
from benchmarks.paths import RESULTS, write_json
from pipeline.schema import DATA_DIR, DATA_FILE_PREFIX, OUTPUT_SCHEMA, RUN_FILE, SELECTION_FILE

VARIANTS = {
    "rarest (today)": [],
    "dedup 0.99 + diverse-rarest": ["--dedup-threshold", "0.99", "--select", "diverse-rarest"],
}


def synthesise(folder: Path, rows: int, rows_per_file: int, seed: int = 0, clusters: int = 2000,
               dimension: int = 64) -> tuple[int, int]:
    """A completed generation output of ``rows`` rows, each with its own embedding (a centre plus noise), a quarter
    of them near-copies of another row of their file with its score and class; returns (bytes on disk, copies)."""
    rng = np.random.default_rng(seed)
    pngs, centres = tiny_pngs(8, rng), rng.standard_normal((clusters, dimension)).astype(np.float32)
    (folder / DATA_DIR).mkdir(parents=True)
    planted = 0
    for start in range(0, rows, rows_per_file):
        n = min(rows_per_file, rows - start)
        ids = [f"{i:012d}" for i in range(start, start + n)]
        scores, labels = rng.normal(-40, 5, n), rng.integers(0, 10, n)
        scores[rng.random(n) < 0.001] = np.nan
        vectors = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, dimension)).astype(np.float32)
        copies, sources = rng.choice(n, n // 4, replace=False), rng.integers(0, n, n // 4)
        vectors[copies] = vectors[sources] + 0.02 * rng.standard_normal((len(copies), dimension)).astype(np.float32)
        scores[copies], labels[copies] = scores[sources], labels[sources]
        planted += len(copies)
        which = rng.integers(0, len(pngs), n)
        columns = {
            "sample_id": pa.array(ids), "seed": pa.array(np.arange(start, start + n)),
            "class_label": pa.array(labels),
            "image": pa.StructArray.from_arrays([pa.array([pngs[w] for w in which], pa.binary()),
                                                 pa.array([f"{i}.png" for i in ids])], ["bytes", "path"]),
            "width": pa.array(np.full(n, 8, np.int32)), "height": pa.array(np.full(n, 8, np.int32)),
            "jepa_score": pa.array(scores, mask=rng.random(n) < 0.001),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dimension),
            "method": pa.array(["jepa"] * n), "model": pa.array(["pixel-unet"] * n),
            "encoder": pa.array(["vit_small_patch14_reg4_dinov2"] * n), "run_id": pa.array(["synthetic"] * n),
            "created_at": pa.array(np.full(n, np.datetime64("2026-11-28T00:00:00", "us"))),
        }
        table = pa.table({field.name: columns[field.name].cast(field.type) if field.name in columns
                          else pa.nulls(n, field.type) for field in OUTPUT_SCHEMA}, schema=OUTPUT_SCHEMA)
        pq.write_table(table, folder / DATA_DIR / f"{DATA_FILE_PREFIX}{start:09d}.parquet", row_group_size=128)
    (folder / RUN_FILE).write_text(json.dumps({"counts": {"committed": rows, "failed": 0}, "last_run_id": "synthetic"}))
    return sum(f.stat().st_size for f in (folder / DATA_DIR).iterdir()), planted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rows-per-file", type=int, default=10_000)
    parser.add_argument("--keep-fraction", type=float, default=0.01)
    parser.add_argument("--results", type=Path, default=RESULTS / "curate_scale_cpu.json", help="where the JSON goes")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        start = time.perf_counter()
        size, planted = synthesise(root / "generated", args.rows, args.rows_per_file)
        print(f"synthesised {args.rows} rows ({size / 2**20:.0f} MiB, {planted} near-copies) in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        for number, (name, flags) in enumerate(VARIANTS.items()):
            output = root / f"curated{number}"
            command = [sys.executable, "-m", "jobs.filter", "--input", str(root / "generated"), "--output", str(output),
                       "--keep-fraction", str(args.keep_fraction), "--per", "class_label",
                       "--tracking-uri", f"sqlite:///{root}/mlflow.db", *flags]
            measured = run_filter_measured(command)
            report = json.loads((output / SELECTION_FILE).read_text())
            kept = pq.read_table(output / DATA_DIR, columns=["sample_id"]).num_rows
            rows.append({"variant": name, "flags": flags, "seconds": measured["seconds"],
                         "peak_rss_bytes": measured["peak_rss_bytes"], "peak_pss_bytes": measured["peak_pss_bytes"],
                         "driver_peak_rss_bytes": measured["driver_peak_rss_bytes"],
                         "rows_kept": kept, "dedup_removed": report["dedup"]["removed"] if report["dedup"] else 0})
            print(f"{name}: {measured['seconds']:.0f} s, kept {kept}, removed {rows[-1]['dedup_removed']}, peak tree "
                  f"RSS {measured['peak_rss_bytes'] / 2**20:.0f} MiB, PSS {measured['peak_pss_bytes'] / 2**20:.0f} MiB, driver "
                  f"RSS {measured['driver_peak_rss_bytes'] / 2**20:.0f} MiB",
                  flush=True)

    settings = {key: value for key, value in vars(args).items() if key != "results"} | {"per": "class_label"}
    write_json(args.results, {"settings": settings, "input_bytes": size, "near_copies": planted, "rows": rows})
    print(f"\nwrote {args.results}")


if __name__ == "__main__":
    main()
