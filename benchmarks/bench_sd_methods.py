"""The Stable Diffusion family's methods side by side on CPU: DDIM (unguided), MinorityPrompt, JEPA guidance.

For the tiny SD of the tests (tests/tiny_diffusion.py) and the mid-size SD of
``benchmarks.bench_guided_sampling`` (SD 1.5's layout at 1/5 UNet and 1/4 VAE width, 256 px, the
full DINOv2-S/14 architecture at 56 px as JEPA's encoder), random weights, saved and loaded through
the presets: seconds per sample (the methods alternating in every round, medians; the clock of
benchmarks/timing.py) and peak memory (RSS high water of one batch, each method in a fresh
process). MinorityPrompt runs the authors' SD 1.5 settings (docs/method.md, 'MinorityPrompt'); JEPA
the demo's cheap step (jobs/configs/demo.yaml; the paper's full step costs more on this SD:
benchmarks/results/guided_cost_sd_cpu.json). Random weights: times and memory
only, never image quality or rarity.

Run from the repository root: ``python -m benchmarks.bench_sd_methods`` (``--quick`` for a smoke
run). Result: benchmarks/results/sd_methods_cpu.json.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.bench_guided_cost import DEMO_GUIDANCE, interleaved_seconds, reset_rss_high_water, rss_high_water_mib
from benchmarks.bench_guided_sampling import PROMPTS, save_sd_shaped
from benchmarks.paths import RESULTS, write_json
from guidance import load_encoder, load_model
from guidance.generate import generate_images
from guidance.methods import MINORITY_PROMPT_SETTINGS, SamplingConfig
from guidance.models import WorkItem
from tests import tiny_diffusion

ENCODER = "vit_small_patch14_reg4_dinov2"
CFG = 7.5
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# family -> (JEPA encoder input size, its timm arguments): the tests' tiny ViT, the full DINOv2-S/14 layout
ENCODERS = {"tiny sd": (28, dict(embed_dim=32, depth=2, num_heads=2, init_values=1.0)),
            "mid-size sd": (56, dict(init_values=1.0))}


def methods(steps: int) -> dict[str, SamplingConfig]:
    """The compared methods by their table name."""
    return {
        "DDIM (unguided)": SamplingConfig(method="unguided", steps=steps, cfg_scale=CFG),
        "MinorityPrompt": SamplingConfig(method="minority-prompt", steps=steps, cfg_scale=CFG,
                                         minority_prompt=MINORITY_PROMPT_SETTINGS["sd-1.5"]),
        "JEPA": SamplingConfig(method="jepa", steps=steps, cfg_scale=CFG, guidance=DEMO_GUIDANCE),
    }


def save_families(root: Path) -> dict[str, Path]:
    return {"tiny sd": tiny_diffusion.save_sd(root / "sd-tiny", root / "tok-tiny"),
            "mid-size sd": save_sd_shaped(root / "sd-mid", root / "tok-mid", 64, 32, 32, 256, 4)}


def loaded(family: str, folder: str):
    """The family's model and its JEPA encoder (random weights, seeded)."""
    torch.manual_seed(0)
    size, model_args = ENCODERS[family]
    return load_model("sd", folder), load_encoder(ENCODER, "random", input_size=size, model_args=model_args)


def work(samples: int) -> list[WorkItem]:
    return [WorkItem(100 + i, prompt=PROMPTS[i % len(PROMPTS)]) for i in range(samples)]


def peak_rss_child(queue, family: str, folder: str, method: str, samples: int, steps: int) -> None:
    """In a fresh process: one batch of ``method``; RSS after loading and the peak while sampling, MiB."""
    model, encoder = loaded(family, folder)
    reset_rss_high_water()
    before = rss_high_water_mib()
    generate_images(model, work(samples), methods(steps)[method], encoder)
    queue.put((before, rss_high_water_mib()))


def peak_rss(family: str, folder: Path, method: str, samples: int, steps: int) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=peak_rss_child, args=(queue, family, str(folder), method, samples, steps))
    child.start()
    before, peak = queue.get()
    child.join()
    return {"rss_after_loading_mib": before, "peak_rss_mib": peak}


def measure_family(family: str, folder: Path, samples: int, steps: int, rounds: int) -> dict:
    model, encoder = loaded(family, str(folder))
    items, configs = work(samples), methods(steps)
    for config in configs.values():  # warm-up
        generate_images(model, items[:1], config, encoder)
    seconds = interleaved_seconds(configs, lambda config: generate_images(model, items, config, encoder), rounds)
    rows = {}
    for method, total in seconds.items():
        rows[method] = {"seconds_per_sample": total / samples} | peak_rss(family, folder, method, samples, steps)
        rows[method]["time_ratio"] = total / seconds["DDIM (unguided)"]
        print(f"{family}  {method}: {rows[method]}", flush=True)
    return {"unet_parameters": sum(p.numel() for p in model.network.parameters()), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2, help="samples per timed batch (and per memory batch)")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds of every method (median)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: the tiny SD only, 1 sample, 1 round")
    parser.add_argument("--output", type=Path, default=RESULTS / f"sd_methods_{DEVICE}.json", help="the results JSON")
    args = parser.parse_args()
    samples, rounds = (1, 1) if args.quick else (args.samples, args.rounds)
    with tempfile.TemporaryDirectory() as scratch:
        folders = save_families(Path(scratch))
        if args.quick:
            folders = {"tiny sd": folders["tiny sd"]}
        families = {family: measure_family(family, folder, samples, args.steps, rounds)
                    for family, folder in folders.items()}
    out = write_json(args.output, {
        "command": " ".join(["python -m benchmarks.bench_sd_methods", *sys.argv[1:]]),
        "settings": vars(args) | {"output": str(args.output), "cfg_scale": CFG, "jepa_guidance": asdict(DEMO_GUIDANCE),
                                  "minority_prompt": asdict(MINORITY_PROMPT_SETTINGS["sd-1.5"])},
        "torch": torch.__version__, "families": families,
        "note": "random weights: times and memory only, not image quality or rarity"})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
