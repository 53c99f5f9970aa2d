"""The cost of guidance against its rarity gain: one row per lever setting, side by side in one run (issue 17).

Part 1, the demo's trained models (jobs/configs/demo.yaml), the same seeds for every setting: time
per sample as a ratio to unguided (timed in alternating rounds, so machine noise hits every setting
alike; medians), the mean exact JEPA-SCORE shift, the non-circular rarity gain (AvgkNN in 16 x 16 grey
pixels against the held-out real digits, pipeline/evaluate/evidence.py, as the demo's evidence), and
class accuracy (an SVM on the training digits). A Pareto plot of AvgkNN gain against time ratio goes
beside the JSON.

Part 2, the mid-size Stable Diffusion (SD 1.5's layout at 1/5 UNet and 1/4 VAE width, 256 px, the
full DINOv2-S/14 architecture at 56 px, random weights): each setting's time ratio to unguided, and
one guided step split into its parts. The cheap guidance decoder is diffusers' AutoencoderTiny at
TAESD's architecture with random weights: its time is measured, its accuracy cannot be. Peak memory
(RSS of a fresh process) of a guided batch with and without micro-batches.

Instead of the parts, where real weights are at hand (``--taesd-check MODEL TAESD ENCODER_WEIGHTS``,
local folders): the cosine of the guidance direction through TAESD to the one
through the model's own VAE, at every guided step of the unguided trajectory.

Run from the repository root: ``python -m benchmarks.bench_guided_cost`` (``--quick`` for a smoke run;
``--part demo`` or ``--part sd`` for one part; ``--demo-set finalists --demo-samples 200`` for the few
settings nearest to the demo target on more samples). Results: benchmarks/results/guided_cost_<part>_<device>.json
(guided_cost_demo_finalists_<device>.json) and guided_cost_pareto_<device>.png.
"""

from __future__ import annotations

import argparse
import multiprocessing
import re
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from diffusers import AutoencoderTiny  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.bench_guided_sampling import PROMPTS, profile_guided_step, save_sd_shaped  # noqa: E402
from benchmarks.paths import DIGITS_DDPM, DIGITS_ENCODER, RESULTS, ROOT, write_json  # noqa: E402
from benchmarks.timing import timed  # noqa: E402
from guidance import load_encoder  # noqa: E402
from guidance.generate import generate, generate_images  # noqa: E402
from guidance.jepa_guidance import JepaGuidance, guidance_direction, sketch_seed  # noqa: E402
from guidance.methods import GuidanceConfig, SamplingConfig  # noqa: E402
from guidance.models import WorkItem  # noqa: E402
from guidance.objectives import get_objective  # noqa: E402
from guidance.presets import load_model  # noqa: E402
from guidance.sampling import sample  # noqa: E402
from guidance.schedules import noise_schedule  # noqa: E402
from pipeline.demo import DEMO_CONFIG  # noqa: E402
from pipeline.demo.digits import digit_classifier, held_out_images  # noqa: E402
from pipeline.evaluate.evidence import Arm, measure  # noqa: E402

ENCODER = "vit_small_patch14_reg4_dinov2"
DEMO = yaml.safe_load((ROOT / DEMO_CONFIG).read_text())["sampling"]
DEMO_GUIDANCE = GuidanceConfig(**DEMO["guidance"])  # the demo config's guidance: the cheap setting chosen here
# The baseline every lever is measured against: the paper's full guided step at the strength docs/results.md
# "Evidence on the demo models" chose (the demo's default before issue 17).
EXACT = GuidanceConfig(eta=0.2, tau=DEMO_GUIDANCE.tau)
EXACT_NAME = f"exact (full, pre-step, q=2, eta={EXACT.eta:g})"


def demo_settings() -> dict[str, GuidanceConfig | None]:
    """name -> guidance (None: unguided). Tweedie-only steps need another strength: a few multiples of
    the exact step's eta each."""
    cheap = dict(gradient="tweedie", placement="posterior-mean", warm_start=True, power_iters=0)
    settings = {
        "unguided": None,
        EXACT_NAME: EXACT,
        "full, posterior-mean": replace(EXACT, placement="posterior-mean"),
        "full, warm start, q=0": replace(EXACT, warm_start=True, power_iters=0),
        "full, interval 2 rescaled": replace(EXACT, interval=2, rescale_interval=True),
        "full, interval 2 reuse": replace(EXACT, interval=2, reuse_direction=True),
    }
    for factor in (1, 1.5, 2.5):
        eta = round(EXACT.eta * factor, 4)
        settings[f"tweedie eta={eta:g}"] = replace(EXACT, gradient="tweedie", eta=eta)
        settings[f"tweedie, post-mean, warm q=0, eta={eta:g}"] = replace(EXACT, eta=eta, **cheap)
    eta = round(EXACT.eta * 1.5, 4)
    settings[f"tweedie, post-mean, warm q=0, interval 2 reuse, eta={eta:g}"] = replace(
        EXACT, eta=eta, interval=2, reuse_direction=True, **cheap)
    return settings


def demo_finalists() -> dict[str, GuidanceConfig | None]:
    """The cheap settings nearest to the demo target in the sweep, beside unguided and the exact step, for
    a run on more samples: 30 samples cannot resolve the target's 1-point accuracy margin."""
    cheap = dict(placement="posterior-mean", warm_start=True, power_iters=0, interval=2, reuse_direction=True)
    settings = {"unguided": None, EXACT_NAME: EXACT,
                f"full, post-mean, warm q=0, eta={EXACT.eta:g}": replace(
                    EXACT, placement="posterior-mean", warm_start=True, power_iters=0),
                f"full, post-mean, warm q=0, interval 2 reuse, eta={EXACT.eta:g}": replace(EXACT, **cheap)}
    for factor in (1.25, 1.375, 1.5):
        eta = round(EXACT.eta * factor, 4)
        guidance = replace(EXACT, eta=eta, gradient="tweedie", **cheap)
        chosen = " (the demo's default)" if guidance == DEMO_GUIDANCE else ""
        settings[f"tweedie, post-mean, warm q=0, interval 2 reuse, eta={eta:g}{chosen}"] = guidance
    return settings


def sd_settings() -> dict[str, tuple[GuidanceConfig | None, bool]]:
    """name -> (guidance, whether the guidance branch decodes with the TAESD-sized AutoencoderTiny)."""
    tau = dict(tau=0.8)
    cheap = dict(gradient="tweedie", placement="posterior-mean", warm_start=True, power_iters=0, **tau)
    return {
        "unguided": (None, False),
        "exact (full, pre-step, q=2)": (GuidanceConfig(**tau), False),
        "full, posterior-mean": (GuidanceConfig(placement="posterior-mean", **tau), False),
        "full, warm start, q=0": (GuidanceConfig(warm_start=True, power_iters=0, **tau), False),
        "full, interval 2 reuse": (GuidanceConfig(interval=2, reuse_direction=True, **tau), False),
        "full, post-mean, warm q=0, interval 2 reuse": (GuidanceConfig(
            placement="posterior-mean", warm_start=True, power_iters=0, interval=2, reuse_direction=True, **tau), False),
        "full, TAESD in guidance": (GuidanceConfig(**tau), True),
        "tweedie": (GuidanceConfig(gradient="tweedie", **tau), False),
        "tweedie, post-mean, warm q=0": (GuidanceConfig(**cheap), False),
        "tweedie, post-mean, warm q=0, TAESD": (GuidanceConfig(**cheap), True),
        "tweedie, post-mean, warm q=0, interval 2 reuse": (GuidanceConfig(interval=2, reuse_direction=True, **cheap),
                                                            False),
        "tweedie, post-mean, warm q=0, interval 2 reuse, TAESD": (
            GuidanceConfig(interval=2, reuse_direction=True, **cheap), True),
    }


def save_taesd_shaped(folder: Path) -> Path:
    """diffusers' AutoencoderTiny at its default, TAESD's own architecture (64 channels, 8x), random weights."""
    torch.manual_seed(0)
    AutoencoderTiny().save_pretrained(folder)
    return folder


def decode_seconds(decode, x0: torch.Tensor) -> float:
    """Median of 3: one decode forward and backward (what a guided step pays for its decoder)."""
    def step():
        latent = x0.clone().requires_grad_(True)
        image = decode(latent)
        image.backward(torch.ones_like(image))

    step()
    return sorted(timed(step)[1] for _ in range(3))[1]


def decoder_direction_cosines(model, items, encoder, config: GuidanceConfig, steps: int, cfg: float,
                              decode, cheap_decode) -> list[float]:
    """Cosine, per guided step and row, of the guidance direction through ``cheap_decode`` to the one
    through ``decode``, from the same x_t of the unguided trajectory and the same sketch seeds: with real
    weights for both, how well a cheap guidance decoder (TAESD) stands in for the VAE."""
    schedule = noise_schedule(model.scheduler_config, steps, "ddim")
    denoiser = model.denoiser(items, cfg)
    states = []

    def recording(x, t):
        states.append((x, t))
        return denoiser(x, t)

    generators = [torch.Generator().manual_seed(item.seed) for item in items]
    x = randn_tensor((len(items), *model.sample_shape), generator=generators, device=model.device, dtype=model.dtype)
    sample(recording, x, schedule, generators)

    def direction(x_t, t, through):
        sketches = [torch.Generator().manual_seed(sketch_seed(item.seed)) for item in items]
        guidance = JepaGuidance(encoder, get_objective("rsvd"), through, config, sketches)
        return guidance_direction(guidance, denoiser, schedule, x_t, t)[0].flatten(1).double()

    cosines = []
    for (x_t, t), guided in zip(states, config.guided_steps(len(schedule.timesteps))):
        if guided:
            cosines += F.cosine_similarity(direction(x_t, t, cheap_decode), direction(x_t, t, decode), dim=1).tolist()
    return cosines


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
    reference, _ = held_out_images()
    classify = digit_classifier()
    items = [WorkItem(1000 + i, i % 10) for i in range(args.demo_samples)]
    wanted = np.array([item.class_label for item in items])
    settings = demo_finalists() if args.demo_set == "finalists" else demo_settings()

    def run(guidance):
        return run_batches(model, items, sampling(guidance, args.demo_steps), encoder, args.batch)

    rows = {}
    for name, guidance in settings.items():  # the stored rows (deterministic: the same images in every round)
        config = sampling(guidance, args.demo_steps)
        samples = [row for i in range(0, len(items), args.batch)
                   for row in generate(model, items[i:i + args.batch], config, encoder)]
        pictures = [Image.fromarray(row.image) for row in samples]
        scores = np.array([row.jepa_score for row in samples])
        (evidence,) = measure([Arm(name, pictures, wanted, scores)], reference, classify)
        rows[name] = {"jepa_score_mean": evidence.jepa_score, "avg_knn_mean": evidence.avg_knn,
                      "rarity_score_mean": evidence.rarity_score, "class_accuracy": evidence.class_accuracy}
        print(f"demo  {name}: {rows[name]}", flush=True)
    for name, seconds in interleaved_seconds(settings, run, args.rounds).items():
        rows[name]["seconds_per_sample"] = seconds / len(items)
    base = rows["unguided"]
    for row in rows.values():
        row["time_ratio"] = row["seconds_per_sample"] / base["seconds_per_sample"]
        row["jepa_score_shift"] = row["jepa_score_mean"] - base["jepa_score_mean"]
        row["avg_knn_gain"] = row["avg_knn_mean"] - base["avg_knn_mean"]
    return {"samples": len(items), "steps": args.demo_steps, "batch": args.batch, "set": args.demo_set, "rows": rows}


def rss_high_water_mib() -> float:
    """This process's peak resident set size since start or the last ``reset_rss_high_water`` (Linux VmHWM)."""
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def reset_rss_high_water() -> None:
    """Start the peak RSS from the current RSS (Linux: ``5`` to /proc/self/clear_refs), so loading's peak
    does not hide sampling's."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_child(queue, folder: str, micro_batch: int | None, samples: int, steps: int) -> None:
    """In a fresh process: one guided batch on the mid-size SD; RSS after loading and the peak while sampling, MiB."""
    torch.manual_seed(0)
    model = load_model("sd", folder)
    encoder = load_encoder(ENCODER, "random", input_size=56, model_args=dict(init_values=1.0))
    items = [WorkItem(100 + i, prompt=PROMPTS[i % 4]) for i in range(samples)]
    reset_rss_high_water()
    before = rss_high_water_mib()
    generate_images(model, items, sampling(GuidanceConfig(tau=0.8, micro_batch=micro_batch), steps, 7.5), encoder)
    queue.put((before, rss_high_water_mib()))


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
    with_taesd = load_model("sd", folder, guidance_decoder=save_taesd_shaped(root / "taesd"))
    encoder = load_encoder(ENCODER, "random", input_size=56, model_args=dict(init_values=1.0))
    items = [WorkItem(100 + i, prompt=PROMPTS[i % 4]) for i in range(args.sd_samples)]
    settings = sd_settings()

    def run(setting):
        guidance, taesd = setting
        return generate_images(with_taesd if taesd else model, items, sampling(guidance, args.sd_steps, 7.5), encoder)[0]

    run((None, False))  # warm-up
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
    with torch.no_grad():
        x0 = torch.randn(len(items), *model.sample_shape, generator=torch.Generator().manual_seed(1))
    decoders = {"vae_decode_fwd_bwd_s": decode_seconds(model.decode, x0),
                "taesd_decode_fwd_bwd_s": decode_seconds(with_taesd.guidance_decode, x0)}
    memory = [peak_rss(folder, micro_batch, args.memory_samples, 2) for micro_batch in (None, 1)]
    return {"samples": len(items), "steps": args.sd_steps, "rows": rows, "guided_step_profile": profile,
            "guidance_decoders": decoders, "peak_memory": memory,
            "taesd_note": "random weights: only its time is measured, not how well its gradient matches the VAE's"}


def decoder_check_part(args) -> dict:
    """With real weights for a latent model, its TAESD and the encoder (local folders): how closely the
    cheap decoder's guidance direction follows the VAE's, for the full and the Tweedie-only gradient."""
    model_folder, taesd, encoder_weights = args.taesd_check
    model = load_model(args.taesd_check_preset, model_folder, guidance_decoder=taesd)
    encoder = load_encoder(ENCODER, encoder_weights, input_size=args.taesd_check_input)
    items = [WorkItem(100 + i, prompt=PROMPTS[i % 4]) for i in range(args.sd_samples)]
    result = {"model": model_folder, "guidance_decoder": taesd, "encoder": encoder_weights, "steps": args.sd_steps}
    for gradient in ("full", "tweedie"):
        cosines = decoder_direction_cosines(model, items, encoder, GuidanceConfig(tau=0.8, gradient=gradient),
                                            args.sd_steps, 7.5, model.decode, model.guidance_decode)
        result[gradient] = {"cosine_mean": statistics.fmean(cosines), "cosine_min": min(cosines), "cosines": cosines}
        print(f"TAESD vs VAE guidance direction, {gradient} gradient: mean cosine {statistics.fmean(cosines):.3f}, "
              f"min {min(cosines):.3f} ({len(cosines)} guided steps x rows)", flush=True)
    return result


def pareto_plot(demo: dict, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    for name, row in demo["rows"].items():
        axis.scatter(row["time_ratio"], row["avg_knn_gain"], color="tab:red" if name == EXACT_NAME else "tab:blue")
        axis.annotate(name, (row["time_ratio"], row["avg_knn_gain"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    axis.set_xscale("log")
    axis.set_xlabel("time per sample / unguided (log)")
    axis.set_ylabel("AvgkNN gain over unguided (16x16 pixels, held-out digits)")
    axis.set_title(f"Demo models: rarity gain against cost ({demo['samples']} samples, {demo['steps']} steps)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-samples", type=int, default=40)
    parser.add_argument("--demo-steps", type=int, default=DEMO["steps"])
    parser.add_argument("--sd-samples", type=int, default=4)
    parser.add_argument("--sd-steps", type=int, default=10)
    parser.add_argument("--memory-samples", type=int, default=8, help="the batch whose peak RSS is measured (one guided step)")
    parser.add_argument("--batch", type=int, default=10, help="demo samples per generate call")
    parser.add_argument("--rounds", type=int, default=2, help="alternating timed rounds (median)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few samples and steps, one round")
    parser.add_argument("--part", choices=("demo", "sd", "both"), default="both")
    parser.add_argument("--taesd-check", nargs=3, metavar=("MODEL", "TAESD", "ENCODER_WEIGHTS"),
                        help="instead of the parts: with real weights (local folders of a latent model, its "
                             "AutoencoderTiny and the encoder), TAESD's guidance direction against the VAE's")
    parser.add_argument("--taesd-check-preset", default="sd", help="the model's preset (sd, sdxl, ...)")
    parser.add_argument("--taesd-check-input", type=int, default=224, help="the encoder's input size")
    parser.add_argument("--demo-set", choices=("sweep", "finalists"), default="sweep",
                        help="every lever setting, or the few nearest to the demo target (run those on more samples)")
    args = parser.parse_args()
    if args.quick:
        args.demo_samples, args.demo_steps, args.sd_samples, args.sd_steps, args.rounds = 10, 5, 1, 3, 1
        args.memory_samples = 2
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    suffix = "_quick" if args.quick else ""
    record = {"settings": vars(args), "torch": torch.__version__}
    if args.taesd_check:
        check = decoder_check_part(args)
        print(f"wrote {write_json(RESULTS / f'guided_cost_taesd_check_{device}.json', record | {'taesd_check': check})}")
        return
    if args.part in ("demo", "both"):
        demo = demo_part(args)
        print("\nDemo models (ratios measured side by side in one run):")
        print(f"  {'setting':<58}{'time x':>8}{'JS shift':>10}{'AvgkNN +':>10}{'accuracy':>10}")
        for name, row in demo["rows"].items():
            print(f"  {name:<58}{row['time_ratio']:>8.2f}{row['jepa_score_shift']:>10.2f}{row['avg_knn_gain']:>10.3f}"
                  f"{row['class_accuracy']:>10.2f}")
        name = "demo" if args.demo_set == "sweep" else "demo_finalists"
        print(f"wrote {write_json(RESULTS / f'guided_cost_{name}_{device}{suffix}.json', record | {'demo': demo})}")
        if args.demo_set == "sweep":
            pareto_plot(demo, RESULTS / f"guided_cost_pareto_{device}{suffix}.png")
    if args.part in ("sd", "both"):
        with tempfile.TemporaryDirectory() as scratch:
            sd = sd_part(args, Path(scratch))
        print("\nMid-size Stable Diffusion, random weights (ratios measured side by side in one run):")
        for name, row in sd["rows"].items():
            print(f"  {name:<58}{row['time_ratio']:>8.2f}")
        print(f"wrote {write_json(RESULTS / f'guided_cost_sd_{device}{suffix}.json', record | {'mid_size_sd': sd})}")


if __name__ == "__main__":
    main()
