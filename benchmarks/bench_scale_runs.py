"""Real runs at scale: tiny unguided samples, a SIGKILL at 40 % and the resume, the census, and the filter.

For each ``--sizes`` N: ``jepa-minority generate`` (``python -m jobs.generate``) of N samples with the test
suite's tiny random class-conditional UNet and a tinier DINOv2-architecture encoder (saved and loaded through the
product's code), unguided, one denoising step, so the driver's costs show, not the models'; into a fresh local
folder, in its own process group with its own local Ray. The benchmark watches the driver process alone
(its peak RSS, sampled every 0.2 s) and the committed data files, reading each new file's footer once. When
40 % of the samples are committed it SIGKILLs the whole group (driver and Ray) and starts the run again:
the resume overhead is the time from that start to its first new data file. Then:

- the census reads every committed row's ``sample_id``: N rows, N distinct (0 duplicates, 0 missing);
- ``jepa-minority filter`` keeps 1 % per class label, measured as ``bench_filter_scale`` measures it.

Results: ``benchmarks/results/scale_runs_cpu.json``. Run from the repository root:
``python -m benchmarks.bench_scale_runs`` (``--sizes 20000`` for a smoke run; 10,000,000 takes hours on 2 cores).
Each size's figures are written as soon as it is measured.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import timm

from benchmarks.bench_filter_scale import run_filter_measured
from benchmarks.paths import RESULTS, ROOT, write_json
from pipeline.schema import DATA_DIR, DATA_FILE_NAME
from tests.conftest import ENCODER_NAME, TINY_SIZE, build_tiny_vit
from tests.tiny_diffusion import save_pixel_unet

CONFIG = ROOT / "jobs" / "configs" / "demo.yaml"
LABELS = 10  # the demo model's classes
KILL_AT = 0.4
ROWS_PER_FILE = 2500  # one batch per data file


class Commits:
    """The committed data files of a run folder, each new one's row count read from its footer once."""

    def __init__(self, data: Path):
        self.data = data
        self.rows: dict[Path, int] = {}

    def poll(self) -> set[Path]:
        new = {path for path in self.data.rglob(DATA_FILE_NAME) if path not in self.rows}
        for path in new:
            self.rows[path] = pq.read_metadata(path).num_rows
        return new

    @property
    def committed(self) -> int:
        return sum(self.rows.values())


def tiny_models(root: Path) -> tuple[Path, Path]:
    """The tests' tiny random UNet and a one-block, 16-wide DINOv2-architecture encoder (the tests' is 2 blocks, 32 wide,
    and its exact JEPA-SCORE took 96 % of a batch's time), saved as users' folders are: (UNet pipeline, encoder)."""
    encoder = root / "tiny_dinov2"
    timm.models.save_for_hf(build_tiny_vit(embed_dim=16, depth=1, num_heads=1), encoder, safe_serialization=True)
    return save_pixel_unet(root / "tiny_unet", num_classes=LABELS), encoder


def start(samples: int, output: Path, log: Path) -> subprocess.Popen:
    unet, encoder = output.parent / "tiny_unet", output.parent / "tiny_dinov2"
    args = [str(CONFIG), "--set", "sampling.method=unguided", "--set", "sampling.steps=1",
            "--set", f"model.source={unet}", "--set", f"encoder.name={ENCODER_NAME}",
            "--set", f"encoder.weights={encoder}", "--set", f"encoder.input_size={TINY_SIZE}",
            "--set", f"output.uri={output}", "--set", f"work.samples_per_label={samples // LABELS}",
            "--set", f"ray.batch_size={ROWS_PER_FILE}", "--set", f"output.max_rows_per_file={ROWS_PER_FILE}",
            "--set", f"tracking.tracking_uri=sqlite:///{output.parent}/mlflow.db",
            "--set", f"tracking.artifact_location={output.parent}/artifacts"]
    with log.open("a") as out:
        return subprocess.Popen([sys.executable, "-m", "jobs.generate", *args], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def watch(driver: subprocess.Popen, commits: Commits, stop_at: int | None, log: Path) -> dict:
    """Follow the driver until it ends or ``stop_at`` samples are committed (then SIGKILL its group)."""
    began, first_new, peak = time.perf_counter(), None, 0
    process = psutil.Process(driver.pid)
    while driver.poll() is None:
        try:
            peak = max(peak, process.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        if commits.poll() and first_new is None:
            first_new = time.perf_counter() - began
        if stop_at is not None and commits.committed >= stop_at:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
            break
        time.sleep(0.2)
    commits.poll()
    if stop_at is None and driver.returncode != 0:
        raise RuntimeError(f"the run failed ({driver.returncode}): {log.read_text()[-3000:]}")
    return {"seconds": round(time.perf_counter() - began, 1), "first_new_commit_s": first_new and round(first_new, 1),
            "driver_peak_rss_mib": round(peak / 2**20), "committed": commits.committed}


def measure(samples: int, root: Path) -> dict:
    output, log = root / "run", root / "driver.log"
    tiny_models(root)
    commits = Commits(output / DATA_DIR)
    killed = watch(start(samples, output, log), commits, int(KILL_AT * samples), log)
    print(f"{samples}: killed at {killed['committed']} committed after {killed['seconds']} s "
          f"(first commit {killed['first_new_commit_s']} s, driver peak {killed['driver_peak_rss_mib']} MiB)", flush=True)
    resumed = watch(start(samples, output, log), commits, None, log)
    print(f"{samples}: resumed, first new commit after {resumed['first_new_commit_s']} s, done after "
          f"{resumed['seconds']} s (driver peak {resumed['driver_peak_rss_mib']} MiB)", flush=True)
    ids = pads.dataset(output / DATA_DIR, format="parquet").to_table(columns=["sample_id"]).column("sample_id")
    census = {"rows": len(ids), "distinct": len(ids.unique()), "duplicates": len(ids) - len(ids.unique()),
              "missing": samples - len(ids.unique()), "files": len(commits.rows)}
    print(f"{samples}: census {census}", flush=True)
    curated = run_filter_measured([sys.executable, "-m", "jobs.filter", "--input", str(output), "--output",
                                   str(root / "curated"), "--keep-fraction", "0.01", "--per", "class_label",
                                   "--tracking-uri", f"sqlite:///{root}/mlflow.db"])
    filtered = {key: curated[key] for key in ("seconds", "peak_rss_bytes", "peak_pss_bytes", "driver_peak_rss_bytes")}
    print(f"{samples}: filter {filtered['seconds']:.0f} s, driver peak {filtered['driver_peak_rss_bytes'] / 2**20:.0f} "
          f"MiB, tree PSS {filtered['peak_pss_bytes'] / 2**20:.0f} MiB", flush=True)
    return {"samples": samples, "killed_run": killed, "resumed_run": resumed, "census": census, "filter": filtered}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--results", type=Path, default=RESULTS / "scale_runs_cpu.json")
    args = parser.parse_args()
    record = {"command": " ".join(["python -m benchmarks.bench_scale_runs", *sys.argv[1:]]), "cpu_count": os.cpu_count(),
              "kill_at": KILL_AT, "rows_per_file": ROWS_PER_FILE,
              "sampling": "unguided, 1 step, the tests' tiny random UNet, a 1-block 16-wide random ViT encoder", "rows": []}
    for samples in args.sizes:  # written after each size: a long run keeps what it measured
        with tempfile.TemporaryDirectory() as scratch:
            record["rows"].append(measure(samples, Path(scratch)))
        write_json(args.results, record)
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
