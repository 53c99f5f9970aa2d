"""Pipeline overhead: the main job on Ray Data vs the same sampler in a plain Python loop.

Both run the demo's config (the digits DDPM and the ViT world prior trained here, JEPA guidance) on the same
work. The loop builds one ``SampleGenerator`` (the Ray actor's class: models loaded once, rows to
PNG rows) and calls it on consecutive batches, with as many torch threads as the Ray actors have
together; nothing is written. The Ray side is ``run_generation`` end to end against local storage
and a local MLflow store: manifest, actor pool, atomic Parquet commits, tracking, ``_run.json``.
Efficiency = Ray samples/s / loop samples/s, with and without the one-off ``ray.init``. Rounds
alternate loop and Ray so machine noise hits both alike. Two layouts by default: one actor with one
thread against a one-thread loop (the pure overhead), and the demo's two actors of half a CPU
against a two-thread loop (process against thread parallelism on the same two cores). Results:
benchmarks/results/pipeline_overhead_<device>.json. Run from the repository root:
``python -m benchmarks.bench_pipeline_overhead``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.paths import RESULTS, ROOT, write_json
from pipeline.cluster import connect_ray
from pipeline.generate.config import GenerateConfig, load_config
from pipeline.generate.job import run_generation
from pipeline.generate.preflight import preflight_generation
from pipeline.generate.sampler_stage import SampleGenerator
from pipeline.generate.work import build_manifest

DEMO_CONFIG = ROOT / "jobs" / "configs" / "demo.yaml"


def job_config(scratch: Path, name: str, args, actors: int, cpus_per_actor: float) -> GenerateConfig:
    return load_config(DEMO_CONFIG, [
        f"output.uri={scratch / name}",
        f"tracking.tracking_uri=sqlite:///{scratch}/mlflow.db",
        f"tracking.artifact_location={scratch / 'artifacts'}",
        f"work.samples_per_label={args.samples // 10}",
        f"sampling.steps={args.steps}",
        f"ray.actors={actors}",
        f"ray.cpus_per_actor={cpus_per_actor}",
        f"ray.batch_size={args.batch_size}",
    ])


def plain_loop(config: GenerateConfig) -> tuple[int, float]:
    """(samples, seconds): the actor's work in one process, model load included."""
    start = time.perf_counter()
    threads = config.ray.actors * max(1, int(config.ray.cpus_per_actor))
    stage = SampleGenerator(config, run_id="plain-loop", threads=threads)
    table = build_manifest(config).table
    rows = sum(stage(table.slice(i, config.ray.batch_size)).num_rows
               for i in range(0, table.num_rows, config.ray.batch_size))
    return rows, time.perf_counter() - start


def on_ray(config: GenerateConfig) -> tuple[int, float]:
    """(samples, seconds): ``run_generation`` end to end on the already started local Ray."""
    start = time.perf_counter()
    summary = run_generation(preflight_generation(config))
    seconds = time.perf_counter() - start
    if not summary.ok:
        raise RuntimeError(f"the Ray run did not complete: {summary}")
    return summary.committed, seconds


def measure(scratch: Path, args, actors: int, cpus_per_actor: float, ray_init_s: float) -> dict:
    loop_rates, ray_rates, ray_seconds = [], [], []
    for round_ in range(args.rounds):
        name = f"{actors}x{cpus_per_actor}-{round_}"
        samples, seconds = plain_loop(job_config(scratch, f"loop-{name}", args, actors, cpus_per_actor))
        loop_rates.append(samples / seconds)
        torch.set_num_threads(1)  # the driver's own share while Ray samples
        samples, seconds = on_ray(job_config(scratch, f"ray-{name}", args, actors, cpus_per_actor))
        ray_rates.append(samples / seconds)
        ray_seconds.append(seconds)
        print(f"  {actors} x {cpus_per_actor} CPU, round {round_ + 1}: loop {loop_rates[-1]:.2f} samples/s, "
              f"Ray {ray_rates[-1]:.2f} samples/s", flush=True)
    loop, ray_rate = statistics.median(loop_rates), statistics.median(ray_rates)
    with_init = args.samples / (statistics.median(ray_seconds) + ray_init_s)
    return {"actors": actors, "cpus_per_actor": cpus_per_actor,
            "loop_threads": actors * max(1, int(cpus_per_actor)),
            "loop_samples_per_s": loop_rates, "ray_samples_per_s": ray_rates,
            "efficiency": ray_rate / loop, "efficiency_with_ray_init": with_init / loop}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=80, help="a multiple of 10 (the digit classes)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--layouts", default="1x1,2x0.5", help="actors x CPUs per actor, comma separated")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    layouts = [(int(a), float(c)) for a, c in (layout.split("x") for layout in args.layouts.split(","))]
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        connect_ray()
        ray_init_s = time.perf_counter() - start
        rows = [measure(Path(scratch), args, actors, cpus, ray_init_s) for actors, cpus in layouts]

    print(f"\nPipeline overhead: {args.samples} demo samples, {args.steps} steps, batch {args.batch_size}, "
          f"ray.init {ray_init_s:.1f} s")
    for r in rows:
        print(f"  {r['actors']} actors x {r['cpus_per_actor']} CPU vs a {r['loop_threads']}-thread loop: "
              f"loop {statistics.median(r['loop_samples_per_s']):.2f} samples/s | Ray Data end to end "
              f"{statistics.median(r['ray_samples_per_s']):.2f} samples/s | efficiency {r['efficiency']:.2f} "
              f"({r['efficiency_with_ray_init']:.2f} counting ray.init)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = write_json(RESULTS / f"pipeline_overhead_{device}.json",
                     {"settings": vars(args), "torch": torch.__version__, "ray_init_s": ray_init_s, "layouts": rows})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
