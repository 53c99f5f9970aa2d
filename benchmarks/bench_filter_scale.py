"""Curation at scale: the filter on 1,000,000 generated rows, wall time and peak memory.

Synthesises a completed generation output of the real schema (``pipeline.schema.OUTPUT_SCHEMA``):
``--rows`` rows in Parquet files of ``--rows-per-file``, each image one of a handful of distinct
8x8 PNGs, a 64-float embedding, random scores (a few null / NaN, as failed rows leave), ten class
labels, and a ``_run.json``. Then runs ``jepa-minority filter`` (``python -m jobs.filter``) in a
subprocess with a local Ray and MLflow store, sampling the memory of its whole process tree
(driver, Ray's own processes, Ray workers) every 0.2 s: the peak of the summed RSS, and of the
summed PSS (shared pages such as the object store counted once). The filter chooses from the
id / score / group columns only, so memory should not grow with the images. Results:
benchmarks/results/filter_scale_cpu.json. Run from the repository root:
``python -m benchmarks.bench_filter_scale``.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from benchmarks.paths import RESULTS, ROOT, write_json
from pipeline.schema import DATA_DIR, DATA_FILE_PREFIX, OUTPUT_SCHEMA, RUN_FILE



def tiny_pngs(count: int, rng: np.random.Generator) -> list[bytes]:
    pngs = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return pngs


def synthesise(folder: Path, rows: int, rows_per_file: int, seed: int = 0) -> int:
    """A completed generation output of ``rows`` rows; returns its bytes on disk."""
    rng = np.random.default_rng(seed)
    pngs = tiny_pngs(8, rng)
    (folder / DATA_DIR).mkdir(parents=True)
    created = pa.array(np.full(rows_per_file, np.datetime64("2026-11-28T00:00:00", "us")), pa.timestamp("us", tz="UTC"))
    embedding = pa.FixedSizeListArray.from_arrays(  # one shared embedding per file keeps synthesis quick
        pa.array(np.tile(rng.standard_normal(64, dtype=np.float32), rows_per_file)), 64).cast(pa.list_(pa.float32()))
    for start in range(0, rows, rows_per_file):
        n = min(rows_per_file, rows - start)
        ids = [f"{i:012d}" for i in range(start, start + n)]
        scores = rng.normal(-40, 5, n)
        scores[rng.random(n) < 0.001] = np.nan
        score_array = pa.array(scores, mask=rng.random(n) < 0.001)
        which = rng.integers(0, len(pngs), n)
        image = pa.StructArray.from_arrays(
            [pa.array([pngs[w] for w in which], pa.binary()), pa.array([f"{i}.png" for i in ids])], ["bytes", "path"])
        table = pa.Table.from_arrays([
            pa.array(ids), pa.array(np.arange(start, start + n)), pa.nulls(n, pa.string()),
            pa.array(rng.integers(0, 10, n)), image, pa.array(np.full(n, 8, np.int32)),
            pa.array(np.full(n, 8, np.int32)), score_array, pa.array(rng.normal(-20, 3, n)), embedding.slice(0, n),
            pa.array(["jepa"] * n), pa.array(["pixel-unet"] * n), pa.array(["vit_small_patch14_reg4_dinov2"] * n),
            pa.array(["synthetic"] * n), created.slice(0, n),
        ], schema=OUTPUT_SCHEMA)
        pq.write_table(table, folder / DATA_DIR / f"{DATA_FILE_PREFIX}{start:09d}.parquet", row_group_size=128)
    (folder / RUN_FILE).write_text(json.dumps({"counts": {"committed": rows, "failed": 0},
                                               "last_run_id": "synthetic"}))
    return sum(f.stat().st_size for f in (folder / DATA_DIR).iterdir())


def tree_memory(root: psutil.Process) -> tuple[int, int, dict[str, dict[str, int]]]:
    """(summed RSS, summed PSS, by process name: count, RSS and PSS) in bytes over ``root`` and its descendants."""
    rss = pss = 0
    by_name: dict[str, dict[str, int]] = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            info, name = process.memory_full_info(), " ".join(process.cmdline()[:3])[:80]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss, pss = rss + info.rss, pss + info.pss
        mine = by_name.setdefault(name, {"processes": 0, "rss": 0, "pss": 0})
        mine["processes"], mine["rss"], mine["pss"] = mine["processes"] + 1, mine["rss"] + info.rss, mine["pss"] + info.pss
    return rss, pss, by_name


def run_filter_measured(command: list[str]) -> dict:
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    watched = psutil.Process(process.pid)
    peak_rss = peak_pss = driver_rss = 0
    at_rss_peak: dict[str, dict[str, int]] = {}
    at_pss_peak: dict[str, dict[str, int]] = {}
    while process.poll() is None:
        rss, pss, by_name = tree_memory(watched)
        if rss > peak_rss:
            peak_rss, at_rss_peak = rss, by_name
        if pss > peak_pss:
            peak_pss, at_pss_peak = pss, by_name
        try:
            driver_rss = max(driver_rss, watched.memory_info().rss)
        except psutil.NoSuchProcess:  # the filter ended between the poll and the look
            pass
        time.sleep(0.2)
    output = process.stdout.read()
    if process.returncode:
        raise RuntimeError(f"filter failed ({process.returncode}):\n{output[-4000:]}")
    return {"seconds": time.perf_counter() - start, "peak_rss_bytes": peak_rss, "peak_pss_bytes": peak_pss,
            "driver_peak_rss_bytes": driver_rss,
            "at_rss_peak_by_process": dict(sorted(at_rss_peak.items(), key=lambda item: -item[1]["rss"])),
            "at_pss_peak_by_process": dict(sorted(at_pss_peak.items(), key=lambda item: -item[1]["pss"])),
            "output_tail": output.strip().splitlines()[-3:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rows-per-file", type=int, default=10_000)
    parser.add_argument("--keep-fraction", type=float, default=0.01)
    parser.add_argument("--per", default="class_label", help="class_label, or '' to choose globally")
    parser.add_argument("--results", type=Path, default=RESULTS / "filter_scale_cpu.json", help="where the JSON goes")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        start = time.perf_counter()
        size = synthesise(root / "generated", args.rows, args.rows_per_file)
        print(f"synthesised {args.rows} rows ({size / 2**20:.0f} MiB) in {time.perf_counter() - start:.0f} s", flush=True)
        command = [sys.executable, "-m", "jobs.filter", "--input", str(root / "generated"),
                   "--output", str(root / "curated"), "--keep-fraction", str(args.keep_fraction),
                   "--tracking-uri", f"sqlite:///{root}/mlflow.db", *(["--per", args.per] if args.per else [])]
        measured = run_filter_measured(command)
        kept = pq.read_table(root / "curated" / DATA_DIR, columns=["sample_id"]).num_rows

    settings = {key: value for key, value in vars(args).items() if key != "results"}
    result = {"settings": settings, "input_bytes": size, "rows_kept": kept, **measured}
    print(f"\nFilter on {args.rows} rows ({size / 2**20:.0f} MiB), keep {args.keep_fraction} per {args.per or 'all'}: "
          f"{measured['seconds']:.0f} s, kept {kept}, peak tree RSS {measured['peak_rss_bytes'] / 2**30:.2f} GiB, "
          f"PSS {measured['peak_pss_bytes'] / 2**30:.2f} GiB")
    for peak in ("rss", "pss"):
        at_peak = measured[f"at_{peak}_peak_by_process"]
        print(f"  at the {peak.upper()} peak: {sum(p['processes'] for p in at_peak.values())} processes")
        for name, memory in list(at_peak.items())[:8]:
            print(f"  {memory[peak] / 2**20:8.0f} MiB {peak.upper()} in {memory['processes']:>2} x {name}")
    write_json(args.results, result)
    print(f"\nwrote {args.results}")


if __name__ == "__main__":
    main()
