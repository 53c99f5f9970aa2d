"""The driver at scale: ``jepa-minority generate --dry-run`` of 1M, 10M and 100M planned samples, wall time and peak
RSS of its whole process.

Each dry run is a fresh ``python`` process (imports included, as a person would run it) on the demo models
(benchmarks/paths.py), unguided, into an output folder that does not exist: the plan, the preflight's checks
and its one line, no sampling. With ``--before ROOT`` the same runs are made against another checkout (the
code before issue #29, whose manifest held one row per sample), up to ``--before-max`` samples. Results:
benchmarks/results/scale_cpu.json. Run from the repository root: ``python -m benchmarks.bench_scale``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.paths import DIGITS_DDPM, DIGITS_ENCODER, RESULTS, ROOT, write_json

CONFIG = ROOT / "jobs" / "configs" / "demo.yaml"
LABELS = 10  # the demo model's classes: samples are planned as LABELS x samples_per_label
# Runs jobs.generate's door in this process and reports its own peak RSS (ru_maxrss: KiB on Linux).
DRY_RUN = """
import resource, sys
from jobs.generate import main
code = main(sys.argv[1:])
print(f"peak_kib {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}")
sys.exit(code)
"""


def dry_run(code_root: Path, samples: int, output: Path) -> dict:
    """One dry run of ``samples`` planned samples with the code at ``code_root``: seconds, peak RSS, its line."""
    args = [str(CONFIG), "--dry-run", "--set", "sampling.method=unguided", "--set", f"model.source={DIGITS_DDPM}",
            "--set", f"encoder.weights={DIGITS_ENCODER}", "--set", f"output.uri={output}",
            "--set", f"work.samples_per_label={samples // LABELS}"]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", DRY_RUN, *args], cwd=code_root, capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": str(code_root)}, timeout=3600)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"dry run of {samples} samples failed: {done.stderr[-2000:]}")
    lines = done.stdout.splitlines()
    peak = next(int(line.split()[1]) for line in lines if line.startswith("peak_kib "))
    said = next(line for line in lines if line.startswith("dry run:"))
    return {"samples": samples, "seconds": round(seconds, 2), "peak_rss_mib": round(peak / 1024, 1), "line": said}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000, 100_000_000])
    parser.add_argument("--before", type=Path, help="a checkout of the code to compare with (e.g. the main branch)")
    parser.add_argument("--before-max", type=int, default=10_000_000,
                        help="largest plan run with --before (its manifest grows by ~0.3 kB per sample)")
    args = parser.parse_args()
    record = {"cpu_count": os.cpu_count(), "config": str(CONFIG.relative_to(ROOT)), "method": "unguided",
              "targets": {"dry_run_100M_seconds": 10, "dry_run_100M_peak_rss_mib": 1024}, "after": [], "before": []}
    with tempfile.TemporaryDirectory() as scratch:
        for samples in args.sizes:
            record["after"].append(dry_run(ROOT, samples, Path(scratch) / "out"))
            print(record["after"][-1], flush=True)
            if args.before and samples <= args.before_max:
                record["before"].append(dry_run(args.before.resolve(), samples, Path(scratch) / "out"))
                print("before", record["before"][-1], flush=True)
    print(write_json(RESULTS / "scale_cpu.json", record))


if __name__ == "__main__":
    main()
