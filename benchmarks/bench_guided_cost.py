"""The cost of guidance against its rarity gain: one row per lever setting, side by side in one run (issue 17).

Part 1, the demo's trained models (digits DDPM, VICReg ViT at 56 px), the same seeds for every setting:
time per sample as a ratio to unguided (timed in alternating rounds, so machine noise hits every
setting alike; medians), the mean exact JEPA-SCORE shift, the non-circular rarity gain (AvgkNN in
8x8 pixel space against all 1,797 real digits, pipeline/evaluate/rarity.py), and class accuracy (an
SVM trained on the real digits). A Pareto plot of AvgkNN gain against time ratio goes beside the JSON.

Part 2, the mid-size Stable Diffusion (SD 1.5's layout at 1/5 UNet and 1/4 VAE width, 256 px, the
full DINOv2-S/14 architecture at 56 px, random weights): each setting's time ratio to unguided, and
one guided step split into its parts. Peak memory (RSS of a fresh process) of a guided batch with and
without micro-batches.

Run from the repository root: ``python -m benchmarks.bench_guided_cost`` (``--quick`` for a smoke run).
Results: benchmarks/results/guided_cost_<device>.json and guided_cost_pareto_<device>.png.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.svm import SVC  # noqa: E402

from benchmarks.bench_guided_sampling import PROMPTS, profile_guided_step, save_sd_shaped  # noqa: E402
from benchmarks.paths import DIGITS_DDPM, DIGITS_ENCODER, RESULTS, write_json  # noqa: E402
from benchmarks.timing import timed  # noqa: E402
from guidance import jepa_score, load_encoder  # noqa: E402
from guidance.generate import generate_images  # noqa: E402
from guidance.methods import GuidanceConfig, SamplingConfig  # noqa: E402
from guidance.models import WorkItem  # noqa: E402
from guidance.presets import load_model  # noqa: E402
from guidance.schedules import noise_schedule  # noqa: E402
from pipeline.demo.digits import digits, to_8x8  # noqa: E402
from pipeline.evaluate.rarity import avg_knn  # noqa: E402

ENCODER = "vit_small_patch14_reg4_dinov2"
DEFAULT = GuidanceConfig(eta=0.03)  # the demo config's guidance (jobs/configs/demo.yaml)


def demo_settings() -> dict[str, GuidanceConfig | None]:
    """name -> guidance (None: unguided). Tweedie-only steps need another strength: a few etas each."""
    cheap = dict(gradient="tweedie", placement="posterior-mean", warm_start=True, power_iters=0)
    return {
        "unguided": None,
        "default (full, pre-step, q=2)": DEFAULT,
        "full, posterior-mean": replace(DEFAULT, placement="posterior-mean"),
        "full, warm start, q=0": replace(DEFAULT, warm_start=True, power_iters=0),
        "full, interval 2 rescaled": replace(DEFAULT, interval=2, rescale_interval=True),
        "full, interval 2 reuse": replace(DEFAULT, interval=2, reuse_direction=True),
        "tweedie eta=0.03": replace(DEFAULT, gradient="tweedie"),
        "tweedie eta=0.05": replace(DEFAULT, gradient="tweedie", eta=0.05),
        "tweedie eta=0.08": replace(DEFAULT, gradient="tweedie", eta=0.08),
        "tweedie, post-mean, warm q=0, eta=0.05": replace(DEFAULT, eta=0.05, **cheap),
        "tweedie, post-mean, warm q=0, eta=0.08": replace(DEFAULT, eta=0.08, **cheap),
        "tweedie, post-mean, warm q=0, interval 2 reuse, eta=0.05": replace(DEFAULT, eta=0.05, interval=2,
                                                                           reuse_direction=True, **cheap),
    }


def sd_settings() -> dict[str, GuidanceConfig | None]:
    tau = dict(tau=0.8)
    cheap = dict(gradient="tweedie", placement="posterior-mean", warm_start=True, power_iters=0, **tau)
    return {
        "unguided": None,
        "default (full, pre-step, q=2)": GuidanceConfig(**tau),
        "full, posterior-mean": GuidanceConfig(placement="posterior-mean", **tau),
        "full, warm start, q=0": GuidanceConfig(warm_start=True, power_iters=0, **tau),
        "full, interval 2 reuse": GuidanceConfig(interval=2, reuse_direction=True, **tau),
        "tweedie": GuidanceConfig(gradient="tweedie", **tau),
        "tweedie, post-mean, warm q=0": GuidanceConfig(**cheap),
        "tweedie, post-mean, warm q=0, interval 2 reuse": GuidanceConfig(interval=2, reuse_direction=True, **cheap),
    }


def sampling(guidance: GuidanceConfig | None, steps: int, cfg: float = 1.0) -> SamplingConfig:
    if guidance is None:
        return SamplingConfig(method="unguided", steps=steps, cfg_scale=cfg)
    return SamplingConfig(method="jepa", steps=steps, cfg_scale=cfg, guidance=guidance)


def run_batches(model, items, config, encoder, batch: int) -> torch.Tensor:
    return torch.cat([generate_images(model, items[i:i + batch], config, encoder)[0] for i in range(0, len(items), batch)])


def interleaved_seconds(settings: dict, run, rounds: int) -> dict[str, float]:
    """Median wall seconds of ``run(setting)`` per setting, the settings alternating in every round."""
    seconds = {name: [] for name in settings}
    for _ in range(rounds):
        for name, guidance in settings.items():
            seconds[name].append(timed(run, guidance)[1])
    return {name: statistics.median(values) for name, values in seconds.items()}


def demo_part(args) -> dict:
    model = load_model("pixel-unet", DIGITS_DDPM)
    encoder = load_encoder(ENCODER, DIGITS_ENCODER, input_size=56)
    real, labels = digits(16)
    real_8x8 = to_8x8(real.expand(-1, 3, -1, -1))
    classifier = SVC(gamma=0.001).fit(real_8x8, labels.numpy())
    items = [WorkItem(1000 + i, i % 10) for i in range(args.demo_samples)]
    wanted = np.array([item.class_label for item in items])
    settings = demo_settings()

    def run(guidance):
        return run_batches(model, items, sampling(guidance, args.demo_steps), encoder, args.batch)

    rows = {}
    for name, guidance in settings.items():  # the images (deterministic: the same in every round)
        images = run(guidance)
        small = to_8x8(images)
        rows[name] = {
            "jepa_score_mean": float(torch.cat([jepa_score(encoder, encoder.resize(part)) for part in images.split(20)])
                                     .mean()),
            "avg_knn_mean": float(avg_knn(small, real_8x8, k=5).mean()),
            "class_accuracy": float((classifier.predict(small) == wanted).mean()),
        }
        print(f"demo  {name}: {rows[name]}", flush=True)
    for name, seconds in interleaved_seconds(settings, run, args.rounds).items():
        rows[name]["seconds_per_sample"] = seconds / len(items)
    base = rows["unguided"]
    for row in rows.values():
        row["time_ratio"] = row["seconds_per_sample"] / base["seconds_per_sample"]
        row["jepa_score_shift"] = row["jepa_score_mean"] - base["jepa_score_mean"]
        row["avg_knn_gain"] = row["avg_knn_mean"] - base["avg_knn_mean"]
    return {"samples": len(items), "steps": args.demo_steps, "batch": args.batch, "rows": rows}


def peak_rss_child(queue, folder: str, micro_batch: int | None, samples: int, steps: int) -> None:
    """In a fresh process: one guided batch on the mid-size SD; its peak RSS in MiB."""
    torch.manual_seed(0)
    model = load_model("sd", folder)
    encoder = load_encoder(ENCODER, "random", input_size=56, model_args=dict(init_values=1.0))
    items = [WorkItem(100 + i, prompt=PROMPTS[i % 4]) for i in range(samples)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    generate_images(model, items, sampling(GuidanceConfig(tau=0.8, micro_batch=micro_batch), steps, 7.5), encoder)
    queue.put((before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def peak_rss(folder: Path, micro_batch: int | None, samples: int, steps: int) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=peak_rss_child, args=(queue, str(folder), micro_batch, samples, steps))
    child.start()
    before, peak = queue.get()
    child.join()
    return {"micro_batch": micro_batch, "rss_after_loading_mib": before, "peak_rss_mib": peak}


def sd_part(args, root: Path) -> dict:
    folder = save_sd_shaped(root / "sd-mid", root / "tok", 64, 32, 32, 256, 4)
    model = load_model("sd", folder)
    encoder = load_encoder(ENCODER, "random", input_size=56, model_args=dict(init_values=1.0))
    items = [WorkItem(100 + i, prompt=PROMPTS[i % 4]) for i in range(args.sd_samples)]
    settings = sd_settings()

    def run(guidance):
        return generate_images(model, items, sampling(guidance, args.sd_steps, 7.5), encoder)[0]

    run(None)  # warm-up
    seconds = interleaved_seconds(settings, run, args.rounds)
    rows = {name: {"seconds": s, "time_ratio": s / seconds["unguided"]} for name, s in seconds.items()}
    for name, row in rows.items():
        print(f"sd    {name}: {row}", flush=True)
    schedule = noise_schedule(model.scheduler_config, args.sd_steps, "ddim")
    t = schedule.timesteps[len(schedule.timesteps) // 2]
    denoiser = model.denoiser(items, 7.5)
    x = torch.randn(len(items), *model.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        denoiser(x, t)
        forward_only = sorted(timed(lambda: denoiser(x, t))[1] for _ in range(3))[1]
    profile = profile_guided_step(model, items, 7.5, encoder, GuidanceConfig(tau=0.8), args.sd_steps)
    profile["denoiser_fwd_only_s"] = forward_only
    memory = [peak_rss(folder, micro_batch, args.sd_samples, 2) for micro_batch in (None, 1)]
    return {"samples": len(items), "steps": args.sd_steps, "rows": rows, "guided_step_profile": profile,
            "peak_memory": memory}


def pareto_plot(demo: dict, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    for name, row in demo["rows"].items():
        axis.scatter(row["time_ratio"], row["avg_knn_gain"], color="tab:red" if name.startswith("default") else "tab:blue")
        axis.annotate(name, (row["time_ratio"], row["avg_knn_gain"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    axis.set_xscale("log")
    axis.set_xlabel("time per sample / unguided (log)")
    axis.set_ylabel("AvgkNN gain over unguided (8x8 pixels, real digits)")
    axis.set_title(f"Demo models: rarity gain against cost ({demo['samples']} samples, {demo['steps']} steps)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-samples", type=int, default=40)
    parser.add_argument("--demo-steps", type=int, default=25)
    parser.add_argument("--sd-samples", type=int, default=4)
    parser.add_argument("--sd-steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=10, help="demo samples per generate call")
    parser.add_argument("--rounds", type=int, default=2, help="alternating timed rounds (median)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few samples and steps, one round")
    args = parser.parse_args()
    if args.quick:
        args.demo_samples, args.demo_steps, args.sd_samples, args.sd_steps, args.rounds = 10, 5, 1, 3, 1
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        demo = demo_part(args)
        sd = sd_part(args, Path(scratch))

    print("\nDemo models (ratios measured side by side in one run):")
    print(f"  {'setting':<58}{'time x':>8}{'JS shift':>10}{'AvgkNN +':>10}{'accuracy':>10}")
    for name, row in demo["rows"].items():
        print(f"  {name:<58}{row['time_ratio']:>8.2f}{row['jepa_score_shift']:>10.2f}{row['avg_knn_gain']:>10.3f}"
              f"{row['class_accuracy']:>10.2f}")
    print("\nMid-size Stable Diffusion, random weights (ratios measured side by side in one run):")
    for name, row in sd["rows"].items():
        print(f"  {name:<58}{row['time_ratio']:>8.2f}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    suffix = "_quick" if args.quick else ""
    out = write_json(RESULTS / f"guided_cost_{device}{suffix}.json",
                     {"settings": vars(args), "torch": torch.__version__, "demo": demo, "mid_size_sd": sd})
    pareto_plot(demo, RESULTS / f"guided_cost_pareto_{device}{suffix}.png")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
